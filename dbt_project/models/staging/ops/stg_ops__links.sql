with

source as (

    select * from {{ source('ops', 'links') }}

),

renamed as (

    select
        token as link_token,
        message_id,
        url,
        cast(created_at as timestamp) as created_at

    from source

)

select * from renamed
