with

source as (

    select * from {{ source('ops', 'clicks') }}

),

renamed as (

    select
        click_id,
        token as link_token,
        message_id,
        cast(clicked_at as timestamp) as clicked_at,
        user_agent

    from source

)

select * from renamed
