-- Every request for a tracked link, people's and link previews' alike (int_clicks_classified
-- tells them apart).

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
        user_agent,
        -- rows from before the store recorded the method were all GETs
        coalesce(upper(method), 'GET') as method

    from source

)

select * from renamed
